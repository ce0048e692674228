//! Baton's event schema (protobuf, package baton.v1)
