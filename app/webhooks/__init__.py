"""Webhooks: signing (Standard Webhooks), the address guard, and the outbox dispatcher. The rows are app/db/webhooks.py."""
