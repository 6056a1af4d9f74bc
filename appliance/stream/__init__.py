"""In and out of the appliance: wire protocol, ZeroMQ ingest actor, sink actor, feedback socket."""
