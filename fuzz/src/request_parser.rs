//! `request_parser`: any bytes as a `POST /v1/chat/completions` body. Parsing either
//! refuses it with a [`RequestError`](echelon_types::RequestError) or yields a request
//! that serialises back to JSON and parses again to the same value; never a panic.

use echelon_types::parse_request;

/// Parses `data`; a request that parses must round-trip.
///
/// # Panics
/// When the parser panics, or when a parsed request does not serialise, or its JSON
/// is refused or parses to a different request.
pub fn check(data: &[u8]) {
    let Ok(request) = parse_request(data) else {
        return;
    };
    let json = match serde_json::to_vec(&request) {
        Ok(json) => json,
        Err(e) => panic!("a parsed request does not serialise: {e}"),
    };
    match parse_request(&json) {
        Ok(again) => assert_eq!(
            again,
            request,
            "the request changed on a round trip through {}",
            String::from_utf8_lossy(&json)
        ),
        Err(e) => panic!(
            "a parsed request's own JSON is refused: {e}; JSON: {}",
            String::from_utf8_lossy(&json)
        ),
    }
}
