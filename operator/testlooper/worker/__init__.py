"""The worker: the agent that runs one task, its result parsing, and the HTTP API it talks to."""
