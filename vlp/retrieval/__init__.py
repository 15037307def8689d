"""Retrieval inference: embedding indexes, search back ends, the search API and the HTTP service."""
