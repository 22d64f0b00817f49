//! API documentation, no sign-in needed: `/openapi.json` (OpenAPI 3.1, built from the route
//! table in [`openapi`]), `/docs` (Swagger UI, whose Authorize button signs in through the
//! OAuth2 password flow of `POST /api/v1/auth/login`) and `/redoc` (ReDoc). The pages'
//! scripts are served from here, taken from the npm registry at build time.
// `#[http_component]` expands to the ABI export glue, which is `unsafe` by nature.
#![allow(unsafe_code)]
#![recursion_limit = "512"]

mod openapi;

use sparkops_platform::http::request_id;
use spin_sdk::http::{IncomingRequest, Method, Response};
use spin_sdk::http_component;

macro_rules! asset {
    ($package:literal, $file:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/", $package, "/", $file))
    };
}

const SWAGGER_CSS: &[u8] = asset!("swagger-ui-dist", "swagger-ui.css");
const SWAGGER_JS: &[u8] = asset!("swagger-ui-dist", "swagger-ui-bundle.js");
const SWAGGER_PRESET_JS: &[u8] = asset!("swagger-ui-dist", "swagger-ui-standalone-preset.js");
const REDOC_JS: &[u8] = asset!("redoc", "bundles/redoc.standalone.js");

const SWAGGER_PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Spark-Ops API</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script src="/docs/swagger-ui-standalone-preset.js"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: "/openapi.json",
      dom_id: "#swagger-ui",
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
      layout: "StandaloneLayout",
      persistAuthorization: true
    });
  </script>
</body>
</html>
"##;

const REDOC_PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Spark-Ops API</title>
</head>
<body>
  <redoc spec-url="/openapi.json"></redoc>
  <script src="/redoc/redoc.standalone.js"></script>
</body>
</html>
"#;

#[http_component]
async fn handle(req: IncomingRequest) -> Response {
    let id = request_id(
        req.headers()
            .get("x-request-id")
            .first()
            .and_then(|v| std::str::from_utf8(v).ok()),
    );
    let path = req.path_with_query().unwrap_or_default();
    let path = path.split('?').next().unwrap_or_default();
    if !matches!(req.method(), Method::Get | Method::Head) {
        return Response::builder()
            .status(405)
            .header("allow", "GET, HEAD")
            .header("x-request-id", id)
            .build();
    }
    let (content_type, body): (&str, Vec<u8>) = match path {
        "/openapi.json" => (
            "application/json",
            openapi::document().to_string().into_bytes(),
        ),
        "/docs" | "/docs/" => ("text/html; charset=utf-8", SWAGGER_PAGE.into()),
        "/docs/swagger-ui.css" => ("text/css", SWAGGER_CSS.into()),
        "/docs/swagger-ui-bundle.js" => ("text/javascript", SWAGGER_JS.into()),
        "/docs/swagger-ui-standalone-preset.js" => ("text/javascript", SWAGGER_PRESET_JS.into()),
        "/redoc" | "/redoc/" => ("text/html; charset=utf-8", REDOC_PAGE.into()),
        "/redoc/redoc.standalone.js" => ("text/javascript", REDOC_JS.into()),
        _ => {
            return Response::builder()
                .status(404)
                .header("x-request-id", id)
                .build();
        }
    };
    Response::builder()
        .status(200)
        .header("content-type", content_type)
        .header("cache-control", "public, max-age=3600")
        .header("x-content-type-options", "nosniff")
        .header("x-request-id", id)
        .body(body)
        .build()
}
