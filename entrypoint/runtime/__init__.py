"""The running service: start-up, its long-lived tasks, the backend process, the watcher."""
