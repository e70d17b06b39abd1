"""Validation of a create request: every rule of the REST contract plus the platform's bounds, all at once.

`violations` says how a broken rule is reported, `model` holds each field's own rules, `cross_field`
the rules spanning fields, `grammars` the version and tag-filter grammars, and `create` runs them all.
"""

from services.deployments.validation.create import validate_create, validate_create_resolving
from services.deployments.validation.cross_field import judged_fields
from services.deployments.validation.model import (
    APP_TYPES,
    DEPLOYMENT_TYPES,
    IMAGE_UPDATE_STRATEGIES,
    DeploymentSpec,
    Volume,
    image_registry,
)
from services.deployments.validation.violations import FIELD_ORDER, SpecInvalid, Violation

__all__ = [
    "APP_TYPES",
    "DEPLOYMENT_TYPES",
    "FIELD_ORDER",
    "IMAGE_UPDATE_STRATEGIES",
    "DeploymentSpec",
    "SpecInvalid",
    "Violation",
    "Volume",
    "image_registry",
    "judged_fields",
    "validate_create",
    "validate_create_resolving",
]
