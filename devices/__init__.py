"""Device protocols (pure decoders) and thin transports for alarm devices."""
