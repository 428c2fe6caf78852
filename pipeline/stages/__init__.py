"""The six stages. Each exposes an API function (folders in, folder out) that the CLI and runner call."""
