"""The emulated cluster: hosts as network namespaces, links as shaped veth pairs."""
