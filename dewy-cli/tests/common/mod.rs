//! Helpers shared by the CLI test files.

/// An OTLP/gRPC collector (the protocol's own service, served by tonic):
/// the metric names of every export, and the port.
pub(crate) fn otlp_grpc_collector() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
        MetricsService, MetricsServiceServer,
    };
    use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    struct Collector(std::sync::Arc<std::sync::Mutex<Vec<String>>>);
    #[tonic::async_trait]
    impl MetricsService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportMetricsServiceRequest>,
        ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
            let mut names = self.0.lock().unwrap();
            for rm in &request.get_ref().resource_metrics {
                for sm in &rm.scope_metrics {
                    names.extend(sm.metrics.iter().map(|m| m.name.clone()));
                }
            }
            Ok(tonic::Response::new(ExportMetricsServiceResponse {
                partial_success: None,
            }))
        }
    }
    let port = dewy_testkit::free_port();
    let names = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let service = MetricsServiceServer::new(Collector(names.clone()));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve(([127, 0, 0, 1], port).into()),
        )
        .unwrap();
    });
    (port, names)
}
