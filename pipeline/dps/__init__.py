"""EnOS DPS: the protocol rules, the HTTP client, and the emulator that stands in for it."""
