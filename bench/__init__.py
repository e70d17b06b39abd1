"""The benchmark of issue 7: our control plane measured against gRPC and NATS ceilings on this machine."""
