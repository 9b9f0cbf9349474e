"""Runs the store contract (tests/store_contract.py) against every adapter in conftest.py."""

from store_contract import StoreContract


class TestStoreContract(StoreContract):
    pass
