"""Binary-cache client: transports, retries, verification, closure walk."""
