"""The execution side: plan, launch and run cells; evaluate questions; write records."""
