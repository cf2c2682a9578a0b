"""Model sources and loaders: what a server or gateway needs of a Hugging Face model.

Nothing is imported here: `swarmgate dht`, `keygen`, `issue` and `status` import
``models.resolve`` or ``models.devices`` alone, without transformers' seconds of imports.
"""
