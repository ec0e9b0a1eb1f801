//! The topic core: names, versions, the newest-value slot and the per-reader
//! cursor. It knows nothing about HTTP, WebSocket, JSON libraries, SQL or
//! Redis; transports, the store and the bus are adapters around it.

mod hub;
mod name;
mod snapshot;
mod subscription;

pub use hub::{Delivery, Follower, Hub, Topic};
pub use name::{InvalidTopicName, MAX_TOPIC_NAME_LEN, TopicName};
pub use snapshot::{Encoded, Epoch, InvalidPosition, Position, Snapshot, WIRE_FORMS, Wire, encodings_total};
pub use subscription::{SubscribeError, Subscription};
