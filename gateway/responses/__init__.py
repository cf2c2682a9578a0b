"""The Responses API: the service, the store of stored responses, the translation to and from
chat, and its request, item and event models."""
