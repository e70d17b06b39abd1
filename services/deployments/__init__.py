"""The gRPC DeploymentService: API, validation, storage, watches and the outbox."""
