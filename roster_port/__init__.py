"""roster-port: ejabberd rosters served by an external program from the operator's database."""

__version__ = "0.1.0"
PROTOCOL_VERSIONS = (2,)
