"""Several sidecars, one decision: coordination through etcd."""
