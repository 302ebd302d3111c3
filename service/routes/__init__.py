"""HTTP routes, one router per concern; each endpoint parses, delegates and shapes the response."""
