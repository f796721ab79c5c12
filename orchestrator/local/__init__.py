"""The system on this machine: the services as processes on 127.0.0.1, the demo, a description of the machine."""
