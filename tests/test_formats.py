"""Ingesting what users have: PDF, DOCX, HTML main content, Markdown headings, DataFrames and
Parquet; unreadable files are reported and skipped, and picked up once fixed.

The PDF and DOCX files are written here with the writer libraries (fpdf2, python-docx)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from benchmarks.ingest_formats import index_content
from dask_rag.config import IndexSpec
from dask_rag.corpus.loaders import MAX_DECOMPRESSED_BYTES, load_file, markdown_sections
from dask_rag.errors import InvalidInput

PAGE3 = "The lighthouse keeper logged every passing schooner in a leather ledger."


def write_pdf(path: Path, pages: list[str]) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    pdf.output(str(path))
    return path


def write_docx(path: Path) -> Path:
    import docx

    d = docx.Document()
    d.add_heading("Field guide", level=1)
    d.add_paragraph("This guide covers the birds of the northern coast.")
    d.add_heading("Seabirds", level=2)
    d.add_paragraph("Puffins nest in burrows on grassy cliff tops every spring.")
    d.add_heading("Gulls", level=3)
    d.add_paragraph("Herring gulls steal chips from unwary tourists on the pier.")
    d.add_heading("Waders", level=2)
    d.add_paragraph("Oystercatchers probe the mudflats with bright orange bills.")
    table = d.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "species", "count"
    table.cell(1, 0).text, table.cell(1, 1).text = "puffin", "1200"
    d.save(str(path))
    return path


HTML = """<!doctype html><html><head><title>Ferry guide</title></head><body>
<nav><a href="/">Home</a> | <a href="/about">About us</a> | <a href="/shop">Shop</a></nav>
<div class="cookie-banner">We use cookies to improve your experience. Accept all cookies.</div>
<article>
<h1>Island ferries</h1>
<p>The morning ferry leaves the harbour at seven and reaches the island before nine, calling
at the lighthouse pier when the tide allows a safe landing for passengers.</p>
<h2>Tickets</h2>
<p>Return tickets are sold at the kiosk beside the harbour master's office and cost less when
bought before the day of travel, with discounts for children and cyclists.</p>
</article>
<footer>Copyright 2026 Ferry Co. All rights reserved. Privacy policy. Terms.</footer>
</body></html>"""

MARKDOWN = """# Install

Use pip to install the package.

## From source

Clone the repository and run make.

```bash
# not a heading: a shell comment in a fence
make install
```

Setext title
============

Body under the setext heading.
"""


# ------------------------------------------------------------------------------------------------
# loaders (in this process)
# ------------------------------------------------------------------------------------------------


def test_markdown_heading_paths():
    secs = markdown_sections(MARKDOWN)
    paths = [s.metadata.get("heading_path") for s in secs]
    assert paths == ["Install", "Install > From source", "Setext title"]
    assert "# not a heading" in secs[1].text and secs[1].text.startswith("From source")
    assert secs[2].text.startswith("Setext title") and "=====" not in secs[2].text


def test_pdf_pages_docx_headings_html_main_content(tmp_path):
    pdf = write_pdf(tmp_path / "log.pdf", ["First page about harbours.",
                                           "Second page about tides.", PAGE3])
    [doc] = load_file(pdf)
    assert [s.metadata["page"] for s in doc.sections] == [1, 2, 3]
    assert "leather ledger" in doc.sections[2].text
    [doc] = load_file(write_docx(tmp_path / "guide.docx"))
    by_text = {s.metadata.get("heading_path"): s.text for s in doc.sections}
    assert "Herring gulls" in by_text["Field guide > Seabirds > Gulls"]
    assert "Oystercatchers" in by_text["Field guide > Waders"]
    assert "puffin | 1200" in doc.text
    (tmp_path / "ferry.html").write_text(HTML)
    [doc] = load_file(tmp_path / "ferry.html")
    assert doc.metadata["title"] == "Ferry guide"
    assert "morning ferry" in doc.text and "kiosk" in doc.text
    for boilerplate in ("About us", "cookies", "Copyright"):
        assert boilerplate not in doc.text
    assert [s.metadata.get("heading_path") for s in doc.sections] == [
        "Island ferries", "Island ferries > Tickets"]


def _broken_files(tmp_path: Path) -> dict[str, Path]:
    good = write_pdf(tmp_path / "src.pdf", ["one", "two", "three"]).read_bytes()
    (tmp_path / "src.pdf").unlink()
    truncated = tmp_path / "truncated.pdf"
    truncated.write_bytes(good[: len(good) // 2])
    bomb = write_docx(tmp_path / "bomb.docx")
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as zf, \
            zf.open("word/media/filler.bin", "w", force_zip64=True) as f:
        block = b"\0" * (1 << 24)
        for _ in range(MAX_DECOMPRESSED_BYTES // len(block) + 1):
            f.write(block)
    latin = tmp_path / "latin.html"
    latin.write_bytes("<html><body><p>Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e</p></body></html>"
                      .encode("latin-1"))
    return {"truncated": truncated, "bomb": bomb, "latin": latin}


def test_unreadable_files_name_the_reason(tmp_path):
    broken = _broken_files(tmp_path)
    reasons = {"truncated": "truncated PDF", "bomb": "decompresses to",
               "latin": "not valid UTF-8"}
    for name, path in broken.items():
        with pytest.raises(InvalidInput, match=reasons[name]) as info:
            load_file(path)
        assert str(path) in str(info.value)
    assert broken["bomb"].stat().st_size < 2 << 20  # small on disk, huge inflated


# ------------------------------------------------------------------------------------------------
# ingestion on the cluster
# ------------------------------------------------------------------------------------------------


def test_ingest_formats_search_page_and_skip_broken_files(client, tmp_path, capsys):
    from dask_rag.cli import main
    from dask_rag.ingest import ingest
    from dask_rag.pipeline import RagPipeline

    docs = tmp_path / "docs"
    docs.mkdir()
    write_pdf(docs / "log.pdf", ["The harbour opens at dawn for fishing boats.",
                                 "Tide tables are posted on the harbour wall.", PAGE3])
    write_docx(docs / "guide.docx")
    (docs / "ferry.html").write_text(HTML)
    (docs / "install.md").write_text(MARKDOWN)
    broken = _broken_files(tmp_path)
    for path in broken.values():
        path.rename(docs / path.name)
    index = tmp_path / "index"
    report = ingest(client, [docs], index, spec=IndexSpec(n_shards=2), progress=False)
    assert sorted(Path(n).name for n, _ in report.skipped) == [
        "bomb.docx", "latin.html", "truncated.pdf"]
    assert report.documents == 4 and "3 file(s) skipped" in report.summary()
    # the CLI names every skipped file and exits with 3 (a partial success)
    code = main(["ingest", str(docs), "--index", str(tmp_path / "cli-index"), "-q",
                 "--scheduler", client.scheduler.address])
    out = capsys.readouterr().out
    assert code == 3 and "3 file(s) skipped" in out
    assert "truncated PDF" in out and "decompresses to" in out and "not valid UTF-8" in out
    with RagPipeline.from_index_dir(client, index) as pipe:
        [hit] = pipe.search("who logged the passing schooners in a ledger?", k=1)
        assert hit.source.endswith("log.pdf") and hit.metadata["page"] == 3
        assert PAGE3 in " ".join(hit.text.split())
        [hit] = pipe.search("herring gulls stealing chips", k=1)
        assert hit.metadata["heading_path"] == "Field guide > Seabirds > Gulls"
        hits = pipe.search("ferry", k=3, filter={"field": "format", "eq": "html"})
        assert hits and all("cookies" not in h.text for h in hits)
        n_before = pipe.index.ntotal
    # fix the broken HTML: the re-run picks it up (and only it)
    (docs / "latin.html").write_text("<html><body><p>Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e is "
                                     "a custard dessert with a burnt sugar top.</p></body></html>",
                                     encoding="utf-8")
    again = ingest(client, [docs], index, progress=False)
    assert again.new_documents == 1 and again.unchanged_documents == 4
    assert again.deleted_documents == 0 and len(again.skipped) == 2
    with RagPipeline.from_index_dir(client, index) as pipe:
        assert pipe.index.ntotal > n_before
        assert pipe.search("burnt sugar custard", k=1)[0].source.endswith("latin.html")


def _rows(n: int) -> list[dict]:
    rng = np.random.default_rng(7)
    words = ["river", "harbour", "ferry", "tide", "lantern", "meadow", "orchard", "quarry",
             "glacier", "canyon", "beacon", "market", "bridge", "tunnel", "valley", "summit"]
    return [{"id": f"row-{i}", "body": " ".join(rng.choice(words, 12)) + f" number {i}.",
             "lang": ["en", "fr"][i % 2], "year": 2000 + i % 20} for i in range(n)]


def test_dataframe_and_parquet_equal_jsonl(client, tmp_path, monkeypatch):
    import pandas as pd

    import dask_rag.ingest
    from dask_rag.ingest import ingest, ingest_dataframe

    rows = _rows(600)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"id": r["id"], "text": r["body"], "metadata": {
        "lang": r["lang"], "year": r["year"]}}) + "\n" for r in rows))
    ingest(client, [jsonl], tmp_path / "from_jsonl", spec=IndexSpec(n_shards=2),
           progress=False)
    df = pd.DataFrame(rows)
    # a first build this large gathers its vectors a batch at a time (one build, then adds)
    monkeypatch.setattr(dask_rag.ingest, "BUILD_BATCH", 128)
    report = ingest_dataframe(client, df, tmp_path / "from_pandas", text="body", id="id",
                              metadata=["lang", "year"], spec=IndexSpec(n_shards=2),
                              progress=False, rows_per_partition=150)
    monkeypatch.undo()
    assert report.documents == 600 and report.built
    assert not list(tmp_path.glob(".from_pandas.staging-*"))
    expected = index_content(tmp_path / "from_jsonl")
    assert index_content(tmp_path / "from_pandas") == expected
    # Parquet through the CLI, from an fsspec URL
    df.to_parquet(tmp_path / "rows.parquet", row_group_size=200)
    url = (tmp_path / "rows.parquet").as_uri()
    cmd = [sys.executable, "-m", "dask_rag.cli", "ingest", url, "--index",
           str(tmp_path / "from_parquet"), "--text-column", "body", "--id-column", "id",
           "--metadata-columns", "lang,year", "--shards", "2", "--workers", "2", "-q",
           "--dashboard", ":0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert index_content(tmp_path / "from_parquet") == expected
    # incremental: a changed row and a dropped row
    df2 = df.drop(index=5).copy()
    df2.loc[7, "body"] = "an entirely new sentence about lighthouses"
    again = ingest_dataframe(client, df2, tmp_path / "from_pandas", text="body", id="id",
                             metadata=["lang", "year"], progress=False)
    assert (again.changed_documents, again.deleted_documents, again.chunks_embedded) == (1, 1, 1)
    with pytest.raises(InvalidInput, match="'missing'"):
        ingest_dataframe(client, df, tmp_path / "x", text="missing", id="id", progress=False)
