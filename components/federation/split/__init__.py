"""Federated split learning (SplitFed): the model cut into a client part and a server part."""
