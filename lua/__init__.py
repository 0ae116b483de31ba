"""Redis Lua scripts, one file per atomic operation (shipped as package data `issuer.lua`)."""
