"""Getting a consortium running: our provisioning builder for the BFV keys, and kit preparation."""
