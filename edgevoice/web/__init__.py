"""The browser device: the page the relay serves, and browser tickets."""
