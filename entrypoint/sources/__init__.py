"""Where adapters come from: a folder, an S3 store, the runtime API's intent."""
