"""Running the roles: every role on loopback as separate processes (`launcher`) and the private demo
(`private_demo`)."""
