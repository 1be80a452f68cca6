"""Live network adapters (FastAPI, MQTT)."""
