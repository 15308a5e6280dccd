"""Validation of Gateway API objects (gateway.networking.k8s.io/v1 HTTPRoute and GRPCRoute).

No pinned package on PyPI carries models of the Gateway API CRDs (cloudcoil has cert-manager, KEDA
and the Prometheus Operator, not gateway-api), so this is the part of the v1 CRDs' OpenAPI schema
that a route of this chart can contain, written out by hand from the Gateway API reference
(gateway.networking.k8s.io/v1, standard channel): same field names, types, enums, patterns and
limits, and no unknown field anywhere (additionalProperties: false), which is what the API server's
structural schema enforces.
"""

from __future__ import annotations

import jsonschema

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
HOSTNAME = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
GROUP = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
KIND = r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"
LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

PORT = {"type": "integer", "minimum": 1, "maximum": 65535}

PARENT_REF = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "group": {"type": "string", "maxLength": 253, "pattern": GROUP},
        "kind": {"type": "string", "minLength": 1, "maxLength": 63, "pattern": KIND},
        "namespace": {"type": "string", "minLength": 1, "maxLength": 63, "pattern": LABEL},
        "name": {"type": "string", "minLength": 1, "maxLength": 253},
        "sectionName": {"type": "string", "minLength": 1, "maxLength": 253, "pattern": DNS_SUBDOMAIN},
        "port": PORT,
    },
}

BACKEND_REF = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "group": {"type": "string", "maxLength": 253, "pattern": GROUP},
        "kind": {"type": "string", "minLength": 1, "maxLength": 63, "pattern": KIND},
        "name": {"type": "string", "minLength": 1, "maxLength": 253},
        "namespace": {"type": "string", "minLength": 1, "maxLength": 63, "pattern": LABEL},
        "port": PORT,
        "weight": {"type": "integer", "minimum": 0, "maximum": 1000000},
        "filters": {"type": "array", "maxItems": 16, "items": {"type": "object"}},
    },
    # CRD rule: "Must have port for Service reference" (kind defaults to Service, group to core).
    "if": {"not": {"anyOf": [{"required": ["kind"]}, {"required": ["group"]}]}},
    "then": {"required": ["name", "port"]},
}

HEADER_MATCH = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "value"],
    "properties": {
        "type": {"enum": ["Exact", "RegularExpression"]},
        "name": {"type": "string", "minLength": 1, "maxLength": 256},
        "value": {"type": "string", "minLength": 1, "maxLength": 4096},
    },
}

COMMON_SPEC = {
    "parentRefs": {"type": "array", "minItems": 1, "maxItems": 32, "items": PARENT_REF},
    "hostnames": {
        "type": "array",
        "maxItems": 16,
        "items": {"type": "string", "minLength": 1, "maxLength": 253, "pattern": HOSTNAME},
    },
}

HTTP_ROUTE_RULE = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 253, "pattern": DNS_SUBDOMAIN},
        "matches": {
            "type": "array",
            "maxItems": 64,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "path": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                            "value": {"type": "string", "maxLength": 1024, "pattern": "^/"},
                        },
                    },
                    "headers": {"type": "array", "maxItems": 16, "items": HEADER_MATCH},
                    "queryParams": {"type": "array", "maxItems": 16, "items": HEADER_MATCH},
                    "method": {"enum": ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]},
                },
            },
        },
        "filters": {"type": "array", "maxItems": 16, "items": {"type": "object"}},
        "backendRefs": {"type": "array", "maxItems": 16, "items": BACKEND_REF},
        "timeouts": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"request": {"type": "string"}, "backendRequest": {"type": "string"}},
        },
    },
}

GRPC_ROUTE_RULE = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 253, "pattern": DNS_SUBDOMAIN},
        "matches": {
            "type": "array",
            "maxItems": 64,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "method": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "type": {"enum": ["Exact", "RegularExpression"]},
                            "service": {"type": "string", "maxLength": 1024},
                            "method": {"type": "string", "maxLength": 1024},
                        },
                    },
                    "headers": {"type": "array", "maxItems": 16, "items": HEADER_MATCH},
                },
            },
        },
        "filters": {"type": "array", "maxItems": 16, "items": {"type": "object"}},
        "backendRefs": {"type": "array", "maxItems": 16, "items": BACKEND_REF},
    },
}

METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 253, "pattern": DNS_SUBDOMAIN},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def route_schema(kind: str, rule: dict) -> dict:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
            "kind": {"const": kind},
            "metadata": METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": dict(COMMON_SPEC, rules={"type": "array", "maxItems": 16, "items": rule}),
            },
        },
    }


SCHEMAS = {
    "HTTPRoute": route_schema("HTTPRoute", HTTP_ROUTE_RULE),
    "GRPCRoute": route_schema("GRPCRoute", GRPC_ROUTE_RULE),
}


def validate(doc: dict) -> None:
    """Raises jsonschema.ValidationError (a ValueError's sibling) if `doc` is not a valid route."""
    schema = SCHEMAS.get(doc.get("kind"))
    if schema is None:
        raise ValueError(f"no Gateway API schema for {doc.get('apiVersion')} {doc.get('kind')}")
    jsonschema.Draft7Validator(schema).validate(doc)
