"""The image updater: polls the registries of deployments with an image update strategy and updates them."""
