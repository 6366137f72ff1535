//! `GET /problems/{slug}`: what each problem `type` means, so that the type
//! URIs in error bodies lead somewhere.

use poem_openapi::{ApiResponse, OpenApi, Tags, param::Path, payload::PlainText};

use crate::http::problem::{ApiError, ProblemJson, ProblemType};

#[derive(Tags)]
enum ProblemTag {
    /// The causes named by error bodies.
    Problems,
}

pub struct ProblemsApi;

fn example_slug() -> String {
    ProblemType::PendingLimit.slug().to_owned()
}

#[derive(ApiResponse)]
enum ProblemTypeResponse {
    /// Title, status and meaning of the type.
    #[oai(status = 200)]
    Found(PlainText<String>),
    /// `not-found`: no such problem type.
    #[oai(status = 404)]
    NotFound(ProblemJson),
}

#[OpenApi(tag = "ProblemTag::Problems")]
impl ProblemsApi {
    /// Describe a problem type (the last segment of a problem's `type`).
    #[oai(path = "/problems/:slug", method = "get", operation_id = "problemType")]
    async fn problem_type(
        &self,
        /// The slug, e.g. `pending-limit`.
        #[oai(example = "example_slug")]
        slug: Path<String>,
    ) -> ProblemTypeResponse {
        match ProblemType::from_slug(&slug.0) {
            Some(kind) => ProblemTypeResponse::Found(PlainText(format!(
                "{}\nstatus: {}\n\n{}\n",
                kind.title(),
                kind.status().as_u16(),
                kind.description()
            ))),
            None => ProblemTypeResponse::NotFound(ApiError::NotFound.payload()),
        }
    }
}
