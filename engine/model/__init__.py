"""The stage transformer: its configuration, position schemes, weight preparation and int8 quantization."""
