"""Tiny randomly initialised models saved to a directory, loaded through the real loaders.

Nothing is downloaded: the tokenizers are trained here on a few sentences with the
``tokenizers`` library, the weights are random (seeded).
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I serialize a Python object to a JSON string?",
    "json.dumps converts an object to a JSON formatted string.",
    "A list can be sorted in place with the sort method.",
    "subprocess.run executes a command and waits for it to finish.",
    "Cats purr, dogs bark and fish swim in the water.",
    "<doc id=\"1\" source=\"json.dumps\"> Question: Answer: [1] [2] [3]",
] * 4


def save_tiny_gpt2(path: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=fast.vocab_size, n_positions=1024, n_embd=32, n_layer=2,
                        n_head=2, bos_token_id=fast.eos_token_id,
                        eos_token_id=fast.eos_token_id)
    model = GPT2LMHeadModel(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def _tiny_wordpiece() -> object:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(CORPUS, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]",
                             pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")


def _tiny_bert_config(vocab_size: int, **kw: object) -> object:
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
                      **kw)


def save_tiny_cross_encoder(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertForSequenceClassification

    fast = _tiny_wordpiece()
    torch.manual_seed(seed)
    model = BertForSequenceClassification(_tiny_bert_config(fast.vocab_size, num_labels=1))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def save_tiny_sentence_transformer(path: Path, pooling: str = "cls", seed: int = 0) -> Path:
    """A sentence-transformers model (tiny BERT + ``pooling`` + Normalize) saved to ``path``."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertModel

    fast = _tiny_wordpiece()
    torch.manual_seed(seed)
    bert_dir = path.parent / f"{path.name}-bert"
    bert_dir.mkdir(parents=True, exist_ok=True)
    BertModel(_tiny_bert_config(fast.vocab_size)).save_pretrained(bert_dir)
    fast.save_pretrained(bert_dir)
    first = models.Transformer(str(bert_dir), max_seq_length=128)
    dim = getattr(first, "get_embedding_dimension", None) or first.get_word_embedding_dimension
    pool = models.Pooling(dim(), pooling_mode=pooling)
    SentenceTransformer(modules=[first, pool, models.Normalize()]).save(str(path))
    return path
