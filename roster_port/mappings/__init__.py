"""Mappings shipped with roster-port (`[store] mapping = "<name>"`); see docs/mappings.md."""
