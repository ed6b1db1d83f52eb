"""The Discord side: slash commands, buttons, messages and delivery of results."""
