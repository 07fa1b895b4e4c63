"""The provider door: an APNs-compatible HTTP/2 API, lpgw's /v1 endpoints, status, metrics."""
