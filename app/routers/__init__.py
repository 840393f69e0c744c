"""Thin HTTP/WebSocket routers: parse, call a service, render."""
