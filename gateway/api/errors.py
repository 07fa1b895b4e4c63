"""API failures as APNs spells them: an HTTP status and a reason string."""

from __future__ import annotations

STATUS = {
    "BadCollapseId": 400, "BadDeviceToken": 400, "BadExpirationDate": 400,
    "BadMessageId": 400, "BadPriority": 400, "BadTopic": 400, "DeviceTokenNotForTopic": 400,
    "DuplicateHeaders": 400, "IdleTimeout": 400, "InvalidPushType": 400,
    "MissingDeviceToken": 400, "MissingTopic": 400, "PayloadEmpty": 400,
    "TopicDisallowed": 400, "BadPayload": 400, "BadRequest": 400,
    "ExpiredProviderToken": 403, "Forbidden": 403, "InvalidProviderToken": 403,
    "MissingProviderToken": 403, "BadPath": 404, "MethodNotAllowed": 405,
    "Unregistered": 410, "PayloadTooLarge": 413, "TooManyRequests": 429,
    "InternalServerError": 500, "ServiceUnavailable": 503, "Shutdown": 503,
    "HTTP2Required": 505,
}


class ApiError(Exception):
    def __init__(self, reason: str, message: str = "", timestamp: float | None = None,
                 allow: str | None = None) -> None:
        """`allow`: with MethodNotAllowed, the methods the path takes (the 405's Allow
        header, which RFC 9110 requires)."""
        super().__init__(message or reason)
        self.reason = reason
        self.status = STATUS.get(reason, 400)
        self.timestamp = timestamp
        self.allow = allow
