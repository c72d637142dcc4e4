"""The HTTP shim: a Starlette app factory and a uvicorn runner (nothing here knows faiss)."""

from dask_rag.serve.app import create_app
from dask_rag.serve.server import ServerThread, run_server

__all__ = ["ServerThread", "create_app", "run_server"]
