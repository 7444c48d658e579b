"""`beni serve`: an OpenAI-compatible server and a chat page for beni models (library code, no Dagster)."""
