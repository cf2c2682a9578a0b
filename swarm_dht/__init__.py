"""The swarm's DHT: joining it (``join``), the DHT process (``dht``), server and model
records in it (``discovery``) and the revocations it carries (``revocations``).

Every network access to the DHT is here; ``routing/`` plans over what this reads and does
no I/O.
"""
