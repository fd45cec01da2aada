//! The extender in-process: inventory, verbs over HTTP, properties, races,
//! and the watchers against a scripted API server.

mod http;
mod inventory;
mod properties;
mod race;
mod support;
mod watch;
