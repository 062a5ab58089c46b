//! `otherworld`: a test fixture, a valid WebAssembly component of a world that is not
//! outpost's handler world (a different `handle` signature, and an import the gateway does
//! not provide). A gateway must refuse to deploy it, naming what does not match.

wit_bindgen::generate!({
    path: "wit",
    world: "other",
});

struct Other;

impl Guest for Other {
    fn handle(input: String) -> String {
        format!("{input} at {}", test::otherworld::clock::now())
    }
}

export!(Other);
