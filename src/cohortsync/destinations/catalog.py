"""
Capability presets for well-known destinations.

These are declarations only (no network code): they let eligibility and
delivery know a destination by name, and let an adapter start from documented
numbers::

    class MyFacebookAdapter(cohortsync.Destination):
        capabilities = cohortsync.destinations.catalog.FACEBOOK_ADS

The numbers come from each platform's public documentation; where a platform
publishes no figure the field keeps the library default.
"""

from __future__ import annotations

from datetime import timedelta
from types import MappingProxyType

from cohortsync._destination import Capabilities, IdentifierKind, RateLimit

__all__ = [
    "AMAZON_S3",
    "BRAZE",
    "CUSTOMER_IO",
    "ENTERPRET",
    "FACEBOOK_ADS",
    "GOOGLE_ADS",
    "HUBSPOT",
    "MARKETO",
    "PRESETS",
    "QUALTRICS",
    "SALESFORCE_MARKETING_CLOUD",
    "THE_TRADE_DESK",
    "TIKTOK_ADS",
    "TWITTER_ADS",
    "WEBHOOK",
    "get",
]

_K = IdentifierKind
_HASHED = frozenset({_K.EMAIL_SHA256, _K.PHONE_SHA256, _K.ADVERTISING_ID})

FACEBOOK_ADS = Capabilities(
    name="Facebook Ads",
    supports_realtime=False,
    max_batch_size=10_000,
    min_audience_size=100,
    accepted_identifiers=_HASHED,
)
"""SHA-256 of normalised email/phone, or advertising device ids; 100-member floor."""

GOOGLE_ADS = Capabilities(
    name="Google Ads",
    supports_realtime=False,
    max_batch_size=10_000,
    min_audience_size=1_000,
    accepted_identifiers=_HASHED,
    membership_ttl=timedelta(days=540),
)
"""Google Ads Customer Match: 10,000 per request (up to 100,000); memberships last 540 days."""

TWITTER_ADS = Capabilities(
    name="Twitter (X) Ads",
    supports_realtime=False,
    max_batch_size=2_500,
    min_audience_size=100,
    rate_limit=RateLimit(requests=1_500, per_seconds=60.0),
    accepted_identifiers=_HASHED,
)
"""2,500 operations (5 MB) per request, 1,500 requests a minute."""

TIKTOK_ADS = Capabilities(
    name="TikTok Ads",
    supports_realtime=False,
    min_audience_size=1_000,
    rate_limit=RateLimit(requests=24, per_seconds=86_400.0),
    accepted_identifiers=_HASHED,
)
"""24 calls a day per audience."""

HUBSPOT = Capabilities(
    name="HubSpot",
    supports_realtime=False,
    rate_limit=RateLimit(requests=100, per_seconds=10.0),
)
"""No real-time syncs; about 100 requests per 10 seconds."""

QUALTRICS = Capabilities(name="Qualtrics", supports_realtime=False, supports_removals=False)
"""No removals: members who leave are forgotten, and re-sent if they come back."""

ENTERPRET = Capabilities(name="Enterpret", supports_realtime=False, supports_removals=False)
"""No removals: members who leave are forgotten, and re-sent if they come back."""

SALESFORCE_MARKETING_CLOUD = Capabilities(
    name="Salesforce Marketing Cloud", supports_realtime=False
)
"""No real-time syncs; otherwise the library defaults."""

AMAZON_S3 = Capabilities(
    name="Amazon S3", supports_realtime=False, full_sync_only=True, max_batch_size=1_000_000
)
"""The whole membership every run, as entering / exiting / existing files."""

THE_TRADE_DESK = Capabilities(
    name="The Trade Desk",
    supports_realtime=False,
    full_sync_only=True,
    membership_ttl=timedelta(days=30),
)
"""Full sync each run; memberships expire after 30 days, so they are refreshed before."""

BRAZE = Capabilities(name="Braze", max_batch_size=1_000)
"""Only users that already exist in Braze are added."""

CUSTOMER_IO = Capabilities(name="Customer.io", max_batch_size=1_000)
"""Real-time capable, batches of 1,000."""

MARKETO = Capabilities(
    name="Marketo", max_batch_size=300, rate_limit=RateLimit(requests=100, per_seconds=20.0)
)
"""Batches of 300, 100 calls per 20 seconds."""

WEBHOOK = Capabilities(name="Webhook", max_batch_size=1_000)
"""Batch size is configurable; one ``message_id`` per batch for de-duplication."""

PRESETS: MappingProxyType[str, Capabilities] = MappingProxyType(
    {
        "facebook_ads": FACEBOOK_ADS,
        "google_ads": GOOGLE_ADS,
        "twitter_ads": TWITTER_ADS,
        "tiktok_ads": TIKTOK_ADS,
        "hubspot": HUBSPOT,
        "qualtrics": QUALTRICS,
        "enterpret": ENTERPRET,
        "salesforce_marketing_cloud": SALESFORCE_MARKETING_CLOUD,
        "amazon_s3": AMAZON_S3,
        "the_trade_desk": THE_TRADE_DESK,
        "braze": BRAZE,
        "customer_io": CUSTOMER_IO,
        "marketo": MARKETO,
        "webhook": WEBHOOK,
    }
)
"""Every preset by its catalog key."""


def get(key: str) -> Capabilities:
    """
    Return the preset for a catalog *key* (e.g. ``"facebook_ads"``).

    Raises:
        LookupError: Unknown key (the message lists the known ones).
    """
    try:
        return PRESETS[key]
    except KeyError:
        from cohortsync.exceptions import DestinationNotFoundError  # noqa: PLC0415

        err = DestinationNotFoundError(key)
        err.args = (f"no catalog preset {key!r}; known: {', '.join(sorted(PRESETS))}",)
        raise err from None
