"""Clients for the servers the gateway talks to, behind small protocols (see ``protocols``)."""
