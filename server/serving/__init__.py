"""Serving: ``fedrec serve`` (FastAPI), its request and response bodies, and the
search engine (dense, lexical, fusion) behind it."""
