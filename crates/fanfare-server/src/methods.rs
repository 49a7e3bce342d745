//! The one table of server API methods. Each method is declared here once:
//! its gRPC name, its snake_case name (HTTP path `/api/<name>` and
//! `/centrifugo/api/<name>`, batch command key, the `method` label of the API
//! metrics) and which of the two APIs serve it. The transports look methods up
//! here and `match` on [`Method`] to run them, so a method added here and not
//! handled by a transport of its API does not compile.

/// The two APIs a node serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// fanfare's own: `fanfare.v1.ControlService` and `POST /api/<method>`.
    Control,
    /// Centrifugo's server API: `centrifugal.centrifugo.api.CentrifugoApi` and
    /// `POST /centrifugo/api/<method>` (`crate::centrifugo`).
    Centrifugo,
}

macro_rules! methods {
    ($($variant:ident $grpc:literal $snake:literal $control:literal $centrifugo:literal;)*) => {
        /// A server API method.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Method { $($variant,)* }

        impl Method {
            /// Every method, in table order.
            pub const ALL: &[Method] = &[$(Method::$variant,)*];

            /// The gRPC method name (`/<service>/<name>`).
            pub fn grpc_name(self) -> &'static str {
                match self { $(Method::$variant => $grpc,)* }
            }

            /// The HTTP path segment, batch command key and metric label.
            pub fn snake(self) -> &'static str {
                match self { $(Method::$variant => $snake,)* }
            }

            pub fn served_by(self, api: Api) -> bool {
                match (self, api) {
                    $((Method::$variant, Api::Control) => $control,
                      (Method::$variant, Api::Centrifugo) => $centrifugo,)*
                }
            }
        }
    };
}

methods! {
    // variant      gRPC name        snake name        Control Centrifugo
    Publish         "Publish"        "publish"         true    true;
    Broadcast       "Broadcast"      "broadcast"       true    true;
    PublishToUser   "PublishToUser"  "publish_to_user" true    false;
    Subscribe       "Subscribe"      "subscribe"       true    true;
    Unsubscribe     "Unsubscribe"    "unsubscribe"     true    true;
    Disconnect      "Disconnect"     "disconnect"      true    true;
    Refresh         "Refresh"        "refresh"         false   true;
    Presence        "Presence"       "presence"        true    true;
    PresenceStats   "PresenceStats"  "presence_stats"  true    true;
    History         "History"        "history"         true    true;
    HistoryRemove   "HistoryRemove"  "history_remove"  false   true;
    Channels        "Channels"       "channels"        true    true;
    Info            "Info"           "info"            true    true;
    Rpc             "RPC"            "rpc"             false   true;
    Batch           "Batch"          "batch"           false   true;
}

impl Method {
    /// The method `api` serves under this gRPC name.
    pub fn from_grpc(api: Api, name: &str) -> Option<Method> {
        Method::ALL.iter().copied().find(|m| m.served_by(api) && m.grpc_name() == name)
    }

    /// The method `api` serves under this snake_case name.
    pub fn from_snake(api: Api, name: &str) -> Option<Method> {
        Method::ALL.iter().copied().find(|m| m.served_by(api) && m.snake() == name)
    }
}

/// Methods of Centrifugo's paid edition (gRPC name, snake name). fanfare does
/// not have them; the Centrifugo-compatible API answers them with 108 "not
/// available" rather than "method not found", so a backend that calls one
/// learns it is a feature missing here, not a typo. In the order of their
/// fields in Centrifugo's batch `Command`, 17 to 35 (`centrifugo::grpc`).
pub const CENTRIFUGO_PRO: &[(&str, &str)] = &[
    ("Connections", "connections"),
    ("UpdateUserStatus", "update_user_status"),
    ("GetUserStatus", "get_user_status"),
    ("DeleteUserStatus", "delete_user_status"),
    ("BlockUser", "block_user"),
    ("UnblockUser", "unblock_user"),
    ("RevokeToken", "revoke_token"),
    ("InvalidateUserTokens", "invalidate_user_tokens"),
    ("DeviceRegister", "device_register"),
    ("DeviceUpdate", "device_update"),
    ("DeviceRemove", "device_remove"),
    ("DeviceList", "device_list"),
    ("DeviceTopicList", "device_topic_list"),
    ("DeviceTopicUpdate", "device_topic_update"),
    ("UserTopicList", "user_topic_list"),
    ("UserTopicUpdate", "user_topic_update"),
    ("SendPushNotification", "send_push_notification"),
    ("UpdatePushStatus", "update_push_status"),
    ("CancelPush", "cancel_push"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_found_only_in_the_api_that_serves_them() {
        assert_eq!(Method::from_grpc(Api::Control, "Publish"), Some(Method::Publish));
        assert_eq!(Method::from_grpc(Api::Centrifugo, "RPC"), Some(Method::Rpc));
        assert_eq!(Method::from_grpc(Api::Control, "HistoryRemove"), None);
        assert_eq!(Method::from_snake(Api::Centrifugo, "publish_to_user"), None);
        assert_eq!(
            Method::from_snake(Api::Control, "publish_to_user"),
            Some(Method::PublishToUser)
        );
        assert_eq!(
            Method::from_snake(Api::Centrifugo, "history_remove"),
            Some(Method::HistoryRemove)
        );
        assert_eq!(Method::from_grpc(Api::Control, "publish"), None);
        assert_eq!(Method::from_snake(Api::Control, ""), None);
    }

    #[test]
    fn names_are_unique_and_paid_methods_are_not_ours() {
        for (i, a) in Method::ALL.iter().enumerate() {
            for b in &Method::ALL[i + 1..] {
                assert_ne!(a.grpc_name(), b.grpc_name());
                assert_ne!(a.snake(), b.snake());
            }
        }
        for (grpc, snake) in CENTRIFUGO_PRO {
            assert!(Method::ALL.iter().all(|m| m.grpc_name() != *grpc && m.snake() != *snake));
        }
    }
}
