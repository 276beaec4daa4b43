"""The public port: routing to the backend, the streaming proxy, the runtime API, auth."""
