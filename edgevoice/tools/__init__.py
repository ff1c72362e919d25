"""Function-calling tools the speech model may call: the registry and the built-ins."""
