"""`tuneloop serve`: the Tinker API, self-hosted, for the unmodified `tinker` SDK (see service/README.md).

Heavy imports (FastAPI, uvicorn, torch) happen only inside the commands, so `tuneloop --help` stays fast.
"""
